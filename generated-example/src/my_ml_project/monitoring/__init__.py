"""After serving: drift and quality of the logged traffic (``monitor``), labelled rows back
into the data (``retrain``), and demo traffic (``simulate``).
"""
