"""One router per resource: health, models and generations, updates, admin."""
