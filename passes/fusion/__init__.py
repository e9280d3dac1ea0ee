"""Operator fusion passes, one module per rule set (see ``_base`` for the rule contract)."""
