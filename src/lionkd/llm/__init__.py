"""Models: one async generation interface (`base.Backend`) and its backends, named in `registry.py` and made
from a config endpoint by `registry.make_backend`; the call cache in front of them (`cache.py`); model names
and files (`models.py`, `templates.py`, `precision.py`); and `lionkd serve` (`server/`)."""
