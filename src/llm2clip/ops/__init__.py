"""Operations: the llm2clip CLI and local run, submit to Kubeflow, the TrainJob launcher, bucket set-up and the
local run's process lifeline. They use the library (llm2clip.*); the library never imports them."""
