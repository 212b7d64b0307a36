"""Raw data to checked, typed, split frames: the ``prepare`` stage (``data.prepare``, run by
DVC) and the schema every later stage reads.
"""
