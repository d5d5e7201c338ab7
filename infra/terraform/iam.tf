# Who may touch what in the bucket:
#   Ray pods (EKS, IRSA) and ray-up nodes: read/write on stage_prefixes,
#     read on input_prefixes (raw/ uploads, models/: base checkpoints and the PLIP
#     teacher). No object outside them, in particular not under mlflow-artifacts/.
#   MLflow server: read/write on mlflow-artifacts/ only.
#   Ray head (ray up): additionally launches and stops its own worker nodes.

locals {
  stage_object_arns  = [for p in var.stage_prefixes : "${aws_s3_bucket.data.arn}/${p}/*"]
  input_object_arns  = [for p in var.input_prefixes : "${aws_s3_bucket.data.arn}/${p}/*"]
  ray_list_prefixes  = flatten([for p in concat(var.stage_prefixes, var.input_prefixes) : [p, "${p}/*"]])
  oidc_provider_host = var.eks_oidc_provider_arn == null ? "" : element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)
}

# ------------------------------------------------------------------ policies

data "aws_iam_policy_document" "ray_data" {
  # Listing under the stage and input prefixes. IfExists: requests that carry no prefix
  # are authorised as s3:ListBucket too and must pass: HeadBucket (pyarrow and Ray Train
  # check the bucket before they create a folder) and the implicit check that makes S3
  # answer 404 rather than 403 for a missing key (every "does it exist yet?" of the
  # stages). The cost: a list request without a prefix sees the bucket's key names (no
  # object content). A list request with any other prefix is still refused.
  statement {
    sid       = "ListStagePrefixes"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]

    condition {
      test     = "StringLikeIfExists"
      variable = "s3:prefix"
      values   = local.ray_list_prefixes
    }
  }

  statement {
    sid       = "BucketRegion"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.data.arn]
  }

  statement {
    sid = "ReadWriteStagePrefixes"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = local.stage_object_arns
  }

  statement {
    sid       = "ReadInputPrefixes"
    actions   = ["s3:GetObject"]
    resources = local.input_object_arns
  }

  statement {
    sid       = "UseBucketKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "ecr_pull" {
  statement {
    sid       = "RegistryLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid       = "PullProjectImage"
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [aws_ecr_repository.mint_ray.arn]
  }
}

# What the Ray autoscaler on a `ray up` head calls to manage its workers.
data "aws_iam_policy_document" "ray_autoscaler" {
  statement {
    sid = "DescribeForAutoscaler"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeAvailabilityZones",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }

  statement {
    sid     = "LaunchWorkers"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
      "${local.ec2_arn}:network-interface/*",
      "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/*",
      "${local.ec2_arn}:key-pair/*",
      "${local.ec2_arn}:placement-group/*",
      "arn:${local.partition}:ec2:${var.region}::image/*",
      "arn:${local.partition}:ec2:${var.region}::snapshot/*",
    ]
  }

  statement {
    sid       = "TagNodes"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*"]
  }

  statement {
    sid       = "StopOnlyThisCluster"
    actions   = ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.ray_cluster_name]
    }
  }

  # ImageId: resolve:ssm:/aws/service/deeplearning/... in cluster/ray-up-aws.yaml
  statement {
    sid       = "ResolvePublicAmiParameters"
    actions   = ["ssm:GetParameters"]
    resources = ["arn:${local.partition}:ssm:${var.region}::parameter/aws/service/*"]
  }

  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.ray_worker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "ray_data" {
  name        = "${var.name}-ray-data"
  description = "Ray stages: read/write on the stage prefixes of ${local.bucket_name}"
  policy      = data.aws_iam_policy_document.ray_data.json
}

resource "aws_iam_policy" "ecr_pull" {
  name        = "${var.name}-ecr-pull"
  description = "Pull the ${var.name} image"
  policy      = data.aws_iam_policy_document.ecr_pull.json
}

resource "aws_iam_policy" "ray_autoscaler" {
  name        = "${var.name}-ray-autoscaler"
  description = "Ray head (ray up): launch, tag and stop workers of cluster ${var.ray_cluster_name}"
  policy      = data.aws_iam_policy_document.ray_autoscaler.json
}

# ----------------------------------------------------- Ray pods on EKS (IRSA)

data "aws_iam_policy_document" "ray_pods_trust" {
  count = var.eks_oidc_provider_arn == null ? 0 : 1

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_provider_host}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_provider_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_pods" {
  count              = var.eks_oidc_provider_arn == null ? 0 : 1
  name               = "${var.name}-ray-pods"
  description        = "Ray pods in ${var.k8s_namespace}/${var.k8s_service_account} (IRSA)"
  assume_role_policy = data.aws_iam_policy_document.ray_pods_trust[0].json
}

resource "aws_iam_role_policy_attachment" "ray_pods_data" {
  count      = var.eks_oidc_provider_arn == null ? 0 : 1
  role       = aws_iam_role.ray_pods[0].name
  policy_arn = aws_iam_policy.ray_data.arn
}

# ------------------------------------------------ ray-up nodes (instance roles)

data "aws_iam_policy_document" "ec2_trust" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_head" {
  name               = "${var.name}-ray-head"
  description        = "Ray head node launched by ray up: stages + autoscaler"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role" "ray_worker" {
  name               = "${var.name}-ray-worker"
  description        = "Ray worker nodes launched by the autoscaler: stages only"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role_policy_attachment" "ray_head_data" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_role_policy_attachment" "ray_head_ecr" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ecr_pull.arn
}

resource "aws_iam_role_policy_attachment" "ray_head_autoscaler" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ray_autoscaler.arn
}

resource "aws_iam_role_policy_attachment" "ray_worker_data" {
  role       = aws_iam_role.ray_worker.name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_role_policy_attachment" "ray_worker_ecr" {
  role       = aws_iam_role.ray_worker.name
  policy_arn = aws_iam_policy.ecr_pull.arn
}

resource "aws_iam_instance_profile" "ray_head" {
  name = "${var.name}-ray-head"
  role = aws_iam_role.ray_head.name
}

resource "aws_iam_instance_profile" "ray_worker" {
  name = "${var.name}-ray-worker"
  role = aws_iam_role.ray_worker.name
}
