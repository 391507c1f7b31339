"""intentd: durable execution for agent operations.

One import name for everything: ``intentd.client`` (send and follow intents),
``intentd.agent`` (write agents), ``intentd.server`` (the control plane),
``intentd.sidecar`` (the process beside each agent).
"""

__version__ = "0.1.0"
