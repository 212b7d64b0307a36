"""Shared by every stage, imported by all and importing none of them: parameters
(``config``), every path and name (``paths``), feature kinds (``features``), files written
atomically (``fileio``) and the package's own layout (``layout``).
"""
