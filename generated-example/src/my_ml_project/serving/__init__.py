"""The model behind HTTP and in batch: the request contract (``contract``), the BentoML
service (``service``), the prediction log (``predlog``), batch scoring (``batch``), and
building and serving a Bento of the champion (``deploy``).
"""
