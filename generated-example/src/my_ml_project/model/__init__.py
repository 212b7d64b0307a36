"""The network and its one artefact, ``model.pt``: build, save, load, predict a frame
(``network``), and the MLflow pyfunc wrapper that ships it (``pyfunc``).
"""
