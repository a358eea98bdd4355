"""The learning half of the loop: corrections become examples, windows train, deltas leave.

correction → example → window → fine-tune → gate → delta → upload, and generations pulled
back (:mod:`dafne_node.learning.sync`).
"""
