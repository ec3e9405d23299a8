"""Discrete-time Gaussian diffusion (ADM's conventions): schedules and respacing, the forward
process through the fused noise injection, the hybrid loss, timestep samplers and few-step
samplers (DDPM, DDIM, DPM-Solver++, each with ADM-ES epsilon scaling)."""
from .losses import (diffusion_loss, discretized_gaussian_log_likelihood, mean_flat, normal_kl, p_mean_variance,
                     predict_xstart, q_posterior, q_sample, vb_terms)
from .samplers import METHODS, logsnr_timesteps, method_timesteps, sample
from .schedule import Schedule, beta_schedule, extract, space_timesteps
from .timestep_sampler import (LossSecondMomentSampler, TimestepSampler, UniformSampler, create_timestep_sampler)

__all__ = ["METHODS", "LossSecondMomentSampler", "Schedule", "TimestepSampler", "UniformSampler", "beta_schedule",
           "create_timestep_sampler", "diffusion_loss", "discretized_gaussian_log_likelihood", "extract",
           "logsnr_timesteps", "mean_flat", "method_timesteps", "normal_kl", "p_mean_variance", "predict_xstart",
           "q_posterior", "q_sample", "sample", "space_timesteps", "vb_terms"]
