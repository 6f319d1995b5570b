"""Tests use the same DynamoDB Local launcher as the local runner."""

from local.dynamodb_local import DynamoDBLocal, free_port

__all__ = ["DynamoDBLocal", "free_port"]
