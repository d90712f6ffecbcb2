"""One module per search method (or per family of one library's methods), each defining Method subclasses; the
registry (`imgret/index/methods.py`) finds every module here. To add a library: a module here, its
`conf/method/<name>.yaml` and its test; nothing else changes."""
