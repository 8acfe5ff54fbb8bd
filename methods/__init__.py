"""Research methods built on pyops ops: one subpackage per method, each with a CLI
(`python -m methods.<name> --help`), its model, data, training loop, an acceptance script, a
README and committed results. Shared training plumbing goes to `methods/common/`."""
