"""The spine every method plugs into: configs, registry, targets, layers, DeltaModel, files."""
