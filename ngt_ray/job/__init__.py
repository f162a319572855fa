"""The moderation job on Ray: the plan, its contracts, the stages, the pipeline, phase timings,
the aggregator, inputs."""
