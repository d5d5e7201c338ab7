data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# The default VPC exists in every new account and is where `ray up` puts nodes.
data "aws_vpc" "selected" {
  id      = var.vpc_id
  default = var.vpc_id == null ? true : null
}

data "aws_subnets" "selected" {
  filter {
    name   = "vpc-id"
    values = [data.aws_vpc.selected.id]
  }
}

locals {
  account_id    = data.aws_caller_identity.current.account_id
  partition     = data.aws_partition.current.partition
  bucket_name   = coalesce(var.bucket_name, "${var.name}-${local.account_id}-${var.region}")
  subnet_ids    = length(var.subnet_ids) > 0 ? var.subnet_ids : sort(data.aws_subnets.selected.ids)
  allowed_cidrs = length(var.allowed_cidr_blocks) > 0 ? var.allowed_cidr_blocks : [data.aws_vpc.selected.cidr_block]
  mlflow_host   = "mlflow.${var.private_zone_name}"
  ec2_arn       = "arn:${local.partition}:ec2:${var.region}:${local.account_id}"
}
