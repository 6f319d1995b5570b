"""SAM's own emulator (`sam local start-api` / `sam local invoke`) on machines like ours.

- docker_engine: the running Docker engine, else a private dockerd that changes nothing
  machine-wide and is stopped by the last one using it.
- lambda_image: AWS's Lambda image when it can be had, else a stand-in built without a
  registry (debootstrap + AWS's runtime interface client), cached as a tarball.
- wiring: DynamoDB Local, the SQS queues and the backend, reachable from the containers.
- api: `sam build`, then `sam local start-api` / `sam local invoke` wired to them.

- events: which function an events/ file is for.

`python -m local.sam api` and `python -m local.sam invoke EVENT [FUNCTION]` are what
`make sam-api` and `make sam-invoke` run.
"""
