"""scalellm: a reference implementation and regression harness for running LLMs on consumer budgets.

The library is plain Python (numpy, torch, transformers); the pytest suites in ``suites/`` drive it.
It never imports pytest.
"""

__version__ = "0.1.0"
