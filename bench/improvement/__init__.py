"""The multi-hospital improvement run's parts (issue 10).

``stats``: the validation-Dice records, the generation x site table and the Dafne-style
mixed-effects slope fit; ``plot``: Dice against generation, both arms in one figure.
"""
