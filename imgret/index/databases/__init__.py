"""One module per vector database (its `DatabaseMethod` subclasses and its `Database` subclass, the open database's
state and the engine's work), on what every database shares (`base.py`); the registry (`imgret/index/methods.py`)
finds every module here. To add a database: a module here and its `conf/method/<name>.yaml`."""
