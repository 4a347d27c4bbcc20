"""Request tier (each SGLang scheduler): how one rank orders, admits and preempts its waiting requests."""
