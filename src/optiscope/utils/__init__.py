"""Small shared utilities: configs, atomic file writes, `name:key=value` specs. No torch-heavy code here."""
