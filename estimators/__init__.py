"""Built-in estimator plug-ins, one file each. The registry discovers these files by path;
drop a new ``.py`` file here (or in ``./estimators`` of your project) to add an estimator."""
