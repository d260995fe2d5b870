"""Training: ``recipe`` reads top to bottom (data, features, the head phase, fine-tuning,
evaluation, the saved model); ``head_loop`` is the plain loop on cached features, ``lightning`` the
Lightning module and fine-tuning policy for phases on images, ``phase`` what both share."""
