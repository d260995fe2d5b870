"""What makes a probability and an unknown answer trustworthy: temperature and unknown scores."""
