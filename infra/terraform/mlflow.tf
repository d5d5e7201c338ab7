# MLflow tracking server: one EC2 instance running `mlflow server` with the
# backend store in RDS PostgreSQL and artifacts proxied to
# s3://<bucket>/<mlflow_artifacts_prefix>/. Clients (Ray jobs, Serve) talk
# HTTP to mlflow.<private zone>:5000 and never touch that prefix themselves.
# Reachable only from inside the VPC; no SSH (use SSM Session Manager).

# ------------------------------------------------------------------ network

resource "aws_security_group" "mlflow" {
  name        = "${var.name}-mlflow"
  description = "MLflow tracking server: HTTP 5000 from the VPC only"
  vpc_id      = data.aws_vpc.selected.id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_http" {
  for_each          = toset(local.allowed_cidrs)
  security_group_id = aws_security_group.mlflow.id
  description       = "MLflow API and UI"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 5000
  to_port           = 5000
}

# Outbound: pip (first boot), S3, Secrets Manager, the database.
resource "aws_vpc_security_group_egress_rule" "mlflow_out" {
  security_group_id = aws_security_group.mlflow.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_security_group" "db" {
  name        = "${var.name}-mlflow-db"
  description = "MLflow PostgreSQL: 5432 from the MLflow server only"
  vpc_id      = data.aws_vpc.selected.id
}

resource "aws_vpc_security_group_ingress_rule" "db_from_mlflow" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the MLflow server"
  referenced_security_group_id = aws_security_group.mlflow.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_route53_zone" "private" {
  name    = var.private_zone_name
  comment = "${var.name} internal names"

  vpc {
    vpc_id = data.aws_vpc.selected.id
  }
}

resource "aws_route53_record" "mlflow" {
  zone_id = aws_route53_zone.private.zone_id
  name    = local.mlflow_host
  type    = "A"
  ttl     = 60
  records = [aws_instance.mlflow.private_ip]
}

# ----------------------------------------------------------------- database

resource "aws_db_subnet_group" "mlflow" {
  name       = "${var.name}-mlflow"
  subnet_ids = local.subnet_ids
}

resource "aws_db_instance" "mlflow" {
  identifier            = "${var.name}-mlflow"
  engine                = "postgres"
  engine_version        = var.db_engine_version
  instance_class        = var.db_instance_class
  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_allocated_storage * 4
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.data.arn

  db_name  = "mlflow"
  username = "mlflow"
  # RDS generates the password and keeps it in Secrets Manager (rotated);
  # it is never in this code, the state, or the instance's user data.
  manage_master_user_password = true

  db_subnet_group_name   = aws_db_subnet_group.mlflow.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az

  backup_retention_period    = 7
  copy_tags_to_snapshot      = true
  auto_minor_version_upgrade = true
  deletion_protection        = var.db_deletion_protection
  skip_final_snapshot        = false
  final_snapshot_identifier  = "${var.name}-mlflow-final"
}

# ------------------------------------------------------------ server's role

data "aws_iam_policy_document" "mlflow" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.mlflow_artifacts_prefix, "${var.mlflow_artifacts_prefix}/*"]
    }
  }

  statement {
    sid       = "ReadWriteArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data.arn}/${var.mlflow_artifacts_prefix}/*"]
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

  statement {
    sid       = "ReadDatabasePassword"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_db_instance.mlflow.master_user_secret[0].secret_arn]
  }
}

resource "aws_iam_role" "mlflow" {
  name               = "${var.name}-mlflow"
  description        = "MLflow tracking server: ${var.mlflow_artifacts_prefix}/ and its database secret"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_policy" "mlflow" {
  name   = "${var.name}-mlflow"
  policy = data.aws_iam_policy_document.mlflow.json
}

resource "aws_iam_role_policy_attachment" "mlflow" {
  role       = aws_iam_role.mlflow.name
  policy_arn = aws_iam_policy.mlflow.arn
}

# Shell access through SSM Session Manager instead of an SSH port.
resource "aws_iam_role_policy_attachment" "mlflow_ssm" {
  role       = aws_iam_role.mlflow.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "mlflow" {
  name = "${var.name}-mlflow"
  role = aws_iam_role.mlflow.name
}

# ------------------------------------------------------------------- server

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

resource "aws_instance" "mlflow" {
  ami                    = data.aws_ssm_parameter.al2023.insecure_value
  instance_type          = var.mlflow_instance_type
  subnet_id              = local.subnet_ids[0]
  vpc_security_group_ids = [aws_security_group.mlflow.id]
  iam_instance_profile   = aws_iam_instance_profile.mlflow.name

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required"
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = 30
    encrypted   = true
    kms_key_id  = aws_kms_key.data.arn
  }

  user_data = templatefile("${path.module}/mlflow-server.sh.tftpl", {
    mlflow_version = var.mlflow_version
    region         = var.region
    db_secret_arn  = aws_db_instance.mlflow.master_user_secret[0].secret_arn
    db_host        = aws_db_instance.mlflow.address
    db_port        = aws_db_instance.mlflow.port
    db_name        = aws_db_instance.mlflow.db_name
    artifacts_uri  = "s3://${aws_s3_bucket.data.id}/${var.mlflow_artifacts_prefix}"
    allowed_hosts  = "${local.mlflow_host},${local.mlflow_host}:5000,localhost:*,127.0.0.1:*"
  })
  user_data_replace_on_change = true

  tags = {
    Name = "${var.name}-mlflow"
  }

  lifecycle {
    # A newer AMI must not replace the server under running jobs; roll it on purpose.
    ignore_changes = [ami]
  }
}
