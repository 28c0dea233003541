"""Code both services import: domain types of the plan contract, validation, logging and the CLI."""
