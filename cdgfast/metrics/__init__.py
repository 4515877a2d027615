"""cdgfast.metrics: FID (Inception features from a local weights file, or "classifier-FID" on the
features of a small CNN trained on the same data set) and continual-learning summaries (AFID@k,
forgetting, MF, IMF, class-distribution KLD), and the text-to-image continual-personalization metrics of the
DC-score paper (KID, MMD with a quadratic kernel, A/F/BWT_MMD, CLIP I2I, N_param; `personalization`)."""
from .classifier import SmallCNN, get_classifier, predict, train_classifier
from .continual import (afid_at_k, class_balanced_labels, class_histogram, class_kld, forgetting, imf,
                        kl_divergence, mf, summarize)
from .fid import (CLASSIFIER_LABEL, FID_BACKBONES, INCEPTION_LABEL, ClassifierFeatures, FidBackboneUnavailable,
                  InceptionFeatures, extract_features, feature_statistics, fid_from_features, fid_inception_cache_path,
                  frechet_distance, resolve_fid_backbone)
from .personalization import (CLIP_LABEL_PREFIX, FALLBACK_LABEL, KID, MMD_KERNELS, PAPER_UNITS, CLIPImageFeatures,
                              FallbackFeatures, clip_i2i, continual_mmd, count_parameters, kid, mmd, nparam_percent,
                              personalization_metrics, polynomial_kernel, resolve_personalization_features,
                              to_paper_units)

__all__ = ["SmallCNN", "get_classifier", "predict", "train_classifier", "afid_at_k", "class_balanced_labels",
           "class_histogram", "class_kld", "forgetting", "imf", "kl_divergence", "mf", "summarize",
           "CLASSIFIER_LABEL", "INCEPTION_LABEL", "ClassifierFeatures", "InceptionFeatures", "extract_features",
           "feature_statistics", "fid_from_features", "frechet_distance", "FID_BACKBONES", "FidBackboneUnavailable",
           "fid_inception_cache_path", "resolve_fid_backbone",
           "CLIP_LABEL_PREFIX", "FALLBACK_LABEL", "KID", "MMD_KERNELS", "PAPER_UNITS", "CLIPImageFeatures",
           "FallbackFeatures", "clip_i2i", "continual_mmd", "count_parameters", "kid", "mmd", "nparam_percent",
           "personalization_metrics", "polynomial_kernel", "resolve_personalization_features", "to_paper_units"]
