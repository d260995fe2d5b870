"""Training: ``recipe`` reads top to bottom (data, features, the head phase, fine-tuning,
evaluation, the saved model); ``head`` is the plain loop on cached features, ``images`` the
Lightning module and fine-tuning policy for phases on images, ``phase`` what both share."""
