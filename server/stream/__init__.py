"""One sidecar's ``AgentService.Connect`` stream, one job per module.

``state`` is the stream (what it was registered with, its outbox and buffer,
its silence, its end); ``leases`` the one record of the leases it holds;
``admission`` the caps and write budgets a replica keeps across streams;
``registration`` the first message; ``inbound`` the messages read after it;
``writes`` the acks and fenced writes they carry; ``claims`` the loop that
claims work for the stream; ``liveness`` its pings and key re-checks;
``lifecycle`` runs them together and writes the outbox to the wire.

The database decides ownership. What this package keeps in memory (which
leases a stream holds) only serves to push work and revocations quickly; it
is re-checked against PostgreSQL on every ping.
"""
