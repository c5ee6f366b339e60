"""Domain models. Kept free of heavy imports so workflows can pass them through the sandbox.

The database tables live in ``models.records``; import that module explicitly where I/O happens.
"""
