"""The toy experiment, apart from the library: `python -m hdb toy` (hdb.toy.experiment), see docs/TOY.md."""
