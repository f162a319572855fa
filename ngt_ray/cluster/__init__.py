"""ngt-ray verbs as Ray jobs on a running cluster, through the Jobs API on the head's dashboard.

``connect`` finds the dashboard and the cluster's auth token, ``package`` decides what travels with
a job (this checkout, or nothing when the nodes run the project image), ``submit`` builds and sends
the job, ``jobs`` follows, lists and stops it.

Credentials never travel with a job: a runtime_env's ``env_vars`` are stored in plain text in the
cluster's runtime_env_agent.log and in ``ray job list``, so a job reads S3 with the identity of the
nodes it runs on (instance role, IRSA, workload identity), like every other process of the cluster.
"""

from ngt_ray.cluster.connect import ClusterError

__all__ = ["ClusterError"]
