"""The lab: what races, measures and faults the library, and the command line.

Everything that starts processes or servers lives here (embedded servers, pods, the TCP
proxy), never in the library: :mod:`coordinator` and :mod:`coordinator.budget` import
nothing from this package (enforced by the import-linter contracts in ``pyproject.toml``).
"""
