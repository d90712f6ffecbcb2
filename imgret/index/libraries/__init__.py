"""One module per search library or algorithm (or per family of one library's methods), each defining `Method`
subclasses; the registry (`imgret/index/methods.py`) finds every module here. To add a library: a module here and
its `conf/method/<name>.yaml`."""
