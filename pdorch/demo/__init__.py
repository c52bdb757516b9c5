"""pdorch.demo: the `pdorch demo` walkthrough."""
