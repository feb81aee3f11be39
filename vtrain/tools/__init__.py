"""Clients of the core, beside it as timm's ``benchmark.py`` and ``validate.py`` are beside ``timm/``: the
benchmark (``python -m vtrain.tools.bench``) and the paper and sweep tables (``python -m vtrain.tools.table``).
They build models and read runs through the core; the core never imports them."""
