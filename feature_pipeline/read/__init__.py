"""Reading features out: the serving copy for model servers, point-in-time joins for training sets."""
