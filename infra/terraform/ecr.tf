# The one image every Ray node runs (cluster/Dockerfile). Tags are immutable:
# a tag names exactly one build, so a RayJob rerun gets the same code.
resource "aws_ecr_repository" "mint_ray" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.data.arn
  }
}

resource "aws_ecr_lifecycle_policy" "mint_ray" {
  repository = aws_ecr_repository.mint_ray.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 30 most recent images (each is ~15 GB with CUDA torch)"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 30
      }
      action = { type = "expire" }
    }]
  })
}
