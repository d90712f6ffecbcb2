"""The configs (the repository's top-level conf/), importable as imgret.conf so that an installed wheel has them."""
