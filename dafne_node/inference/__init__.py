"""The inference half of the loop: a complete series becomes a SEG on its way to PACS.

receive → assemble → route → segment → deliver.
"""
