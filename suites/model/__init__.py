"""Real-model tier: every loading method on SmolLM2-135M-Instruct (or ``--model PATH``)."""
