variable "region" {
  description = "AWS region for every resource (pick one with p4d/p5 and g6e capacity, e.g. us-west-2 or us-east-1)."
  type        = string
  default     = "us-west-2"
}

variable "name" {
  description = "Prefix of every name (roles, bucket, repository, database). Roles are <name>-ray-pods, <name>-ray-head, <name>-ray-worker, <name>-mlflow."
  type        = string
  default     = "mint-ray"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name: lowercase letters, digits and dashes, 2-31 characters, starting with a letter."
  }
}

variable "bucket_name" {
  description = "S3 bucket for data, checkpoints, models and MLflow artifacts. Null: <name>-<account id>-<region> (bucket names are global)."
  type        = string
  default     = null
}

variable "stage_prefixes" {
  description = "Bucket prefixes the pipeline stages read and write (Ray pods and ray-up nodes get read/write on exactly these)."
  type        = list(string)
  default     = ["cohorts", "teachers", "preferences", "checkpoints", "students", "evaluations"]

  validation {
    condition     = alltrue([for p in var.stage_prefixes : can(regex("^[a-z0-9][a-z0-9_-]*$", p))])
    error_message = "stage_prefixes: single path segments without slashes (e.g. \"checkpoints\")."
  }
}

variable "input_prefixes" {
  description = "Bucket prefixes the stages only read: raw/ (notes and images uploaded by people) and models/ (copies of the base checkpoints and the PLIP teacher that the recipes name)."
  type        = list(string)
  default     = ["raw", "models"]
}

variable "mlflow_artifacts_prefix" {
  description = "Bucket prefix of MLflow's artifact store. Only the MLflow server's role can touch it; clients upload through the server."
  type        = string
  default     = "mlflow-artifacts"
}

variable "checkpoint_expiration_days" {
  description = "Objects under checkpoints/ expire after this many days (Ray Train keeps the latest ones per run; the consolidated model goes to students/ and the MLflow registry)."
  type        = number
  default     = 30
}

variable "noncurrent_version_expiration_days" {
  description = "Overwritten or deleted object versions are kept this many days (versioning is the undo for a bad overwrite)."
  type        = number
  default     = 30
}

variable "vpc_id" {
  description = "VPC for MLflow, its database and the private DNS zone. Null: the account's default VPC (what `ray up` uses). For EKS, the cluster's VPC."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Subnets (two or more AZs) for the database and the MLflow instance. Empty: every subnet of the VPC."
  type        = list(string)
  default     = []
}

variable "allowed_cidr_blocks" {
  description = "Who may reach MLflow on port 5000. Empty: the VPC's CIDR (Ray nodes and EKS pods)."
  type        = list(string)
  default     = []
}

variable "private_zone_name" {
  description = "Private Route 53 zone in the VPC; MLflow is mlflow.<zone>:5000 (the URI the cluster manifests use)."
  type        = string
  default     = "mint-ray.internal"
}

variable "eks_oidc_provider_arn" {
  description = "IAM OIDC provider ARN of the EKS cluster (eksctl utils associate-iam-oidc-provider). Null: no IRSA role for Ray pods (ray-up only)."
  type        = string
  default     = null
}

variable "k8s_namespace" {
  description = "Namespace of the Ray pods (cluster/kubernetes/base.yaml)."
  type        = string
  default     = "mint-ray"
}

variable "k8s_service_account" {
  description = "Service account of the Ray pods; the IRSA role trusts only this one."
  type        = string
  default     = "mint-ray"
}

variable "ray_cluster_name" {
  description = "cluster_name in cluster/ray-up-aws.yaml; the head may stop/terminate only instances tagged with it."
  type        = string
  default     = "mint-ray"
}

variable "mlflow_version" {
  description = "MLflow installed on the tracking server (same as the project's pin)."
  type        = string
  default     = "3.17.2"
}

variable "mlflow_instance_type" {
  description = "Instance type of the MLflow tracking server."
  type        = string
  default     = "m7i.large"
}

variable "db_instance_class" {
  description = "RDS PostgreSQL instance class for MLflow's backend store."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_engine_version" {
  description = "PostgreSQL major version."
  type        = string
  default     = "16"
}

variable "db_allocated_storage" {
  description = "Initial database storage in GiB (autoscaling up to 4x)."
  type        = number
  default     = 50
}

variable "db_multi_az" {
  description = "Standby in a second AZ."
  type        = bool
  default     = false
}

variable "db_deletion_protection" {
  description = "Refuse to delete the database (set false before `terraform destroy`)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}
