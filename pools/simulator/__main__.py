"""`python -m pools.simulator [flags]`: the offline LLM simulator, no Django needed."""

from pools.simulator.cli import main

main()
