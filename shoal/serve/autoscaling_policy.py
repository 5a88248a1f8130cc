"""``from shoal.serve.autoscaling_policy import ...``: Ray's ``ray.serve.autoscaling_policy``."""

from shoal._controller.policy import replica_queue_length_autoscaling_policy

default_autoscaling_policy = replica_queue_length_autoscaling_policy

__all__ = ["default_autoscaling_policy", "replica_queue_length_autoscaling_policy"]
