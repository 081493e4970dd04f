"""E2B compatibility (issue 20): the REST control plane and the in-sandbox traffic that the unmodified E2B SDKs
speak, translated onto the gateway's own gRPC API over loopback, so that lifecycle, exec and files have one
implementation. See docs/e2b.md."""
