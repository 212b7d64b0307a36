"""The MLflow tracking store and model registry: runs, versions, the ``champion`` alias, the
promotion lock and the champion history that rollback walks (``store``).
"""
