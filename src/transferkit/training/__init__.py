"""Training: ``recipe`` is the fit (the head phase, then fine-tuning) as ``plan`` decides it;
``head_loop`` is the plain loop on cached features, ``lightning`` the Lightning module and callbacks
for phases on images or activations, ``bookkeeping`` the epochs' record both keep, ``phase`` the
schedule, sampler and loss both share."""
