"""One router per resource of the admin API: health, status, jobs, metrics."""
