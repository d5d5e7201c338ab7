output "bucket_name" {
  description = "Recipes address data as s3://<bucket_name>/<prefix>/..."
  value       = aws_s3_bucket.data.id
}

output "bucket_prefixes" {
  description = "What each role may touch in the bucket."
  value = {
    read_write_for_ray = var.stage_prefixes
    read_only_for_ray  = var.input_prefixes
    mlflow_server_only = var.mlflow_artifacts_prefix
  }
}

output "kms_key_arn" {
  description = "Key encrypting the bucket, the database, the MLflow disk and the images."
  value       = aws_kms_key.data.arn
}

output "ecr_repository_url" {
  description = "docker build -f cluster/Dockerfile -t <this>:<tag> . && docker push <this>:<tag>"
  value       = aws_ecr_repository.mint_ray.repository_url
}

output "ray_pods_role_arn" {
  description = "eks.amazonaws.com/role-arn of the mint-ray service account (cluster/kubernetes/base.yaml); null without eks_oidc_provider_arn."
  value       = one(aws_iam_role.ray_pods[*].arn)
}

output "ray_head_instance_profile" {
  description = "IamInstanceProfile.Name of the head node type in cluster/ray-up-aws.yaml."
  value       = aws_iam_instance_profile.ray_head.name
}

output "ray_worker_instance_profile" {
  description = "IamInstanceProfile.Name of the worker node types in cluster/ray-up-aws.yaml."
  value       = aws_iam_instance_profile.ray_worker.name
}

output "mlflow_tracking_uri" {
  description = "MLFLOW_TRACKING_URI for every stage (reachable inside the VPC)."
  value       = "http://${local.mlflow_host}:5000"
}

output "mlflow_instance_id" {
  description = "aws ssm start-session --target <this> --document-name AWS-StartPortForwardingSession --parameters portNumber=5000,localPortNumber=5000"
  value       = aws_instance.mlflow.id
}

output "mlflow_db_endpoint" {
  description = "PostgreSQL endpoint of the backend store (private)."
  value       = aws_db_instance.mlflow.endpoint
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret holding the database credentials (managed and rotated by RDS)."
  value       = aws_db_instance.mlflow.master_user_secret[0].secret_arn
}
