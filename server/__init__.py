"""The intentd control plane: an asyncio gRPC server on PostgreSQL."""
