"""The ``looplens`` command line, above the library: it imports ``lens``, ``probes``, ``studies`` and
``app``; none of them imports it. The import packages themselves are ``lens`` (models), ``probes``
(lenses, analyzers, the run store), ``kernels``, ``studies`` and ``app``."""
