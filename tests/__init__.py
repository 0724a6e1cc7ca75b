"""The zoo's test suite (a regular package, so ``tests.*`` never resolves to another distribution's top-level ``tests``)."""
